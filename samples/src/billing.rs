//! The phone-billing saga of the seed's post on concurrency: calls, SMS and payments for one
//! account, handled by different workers from the same version of the statement, saved as
//! siblings by the merging persister, and merged — every item once, by its unique id, with
//! the overdraft charge recalculated and a compensation sent when a merge waives it.

use async_trait::async_trait;
use rhinobus::{HandlerError, Message};
use rhinobus_sagas::{
    InitiatedBy, MergeSagaState, Orchestrates, OrchestratesMerge, Routes, Saga, SagaContext,
    SagaStateMerger,
};
use serde::{Deserialize, Serialize};

/// An SMS costs 2$.
pub const SMS_CENTS: i64 = 200;
/// A minute of call costs 5$.
pub const MINUTE_CENTS: i64 = 500;
/// The charge for going below zero.
pub const OVERDRAFT_CENTS: i64 = 1_000;

macro_rules! message {
    ($t:ident, $name:literal) => {
        impl Message for $t {
            const NAME: &'static str = $name;
        }
    };
}

/// Opens the statement of an account with its balance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenAccount {
    /// The account (a phone number).
    pub phone: String,
    /// Id of the opening balance item.
    pub deposit_id: String,
    /// The opening balance.
    pub cents: i64,
}
message!(OpenAccount, "billing.open-account");

/// A call was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallMade {
    /// The account.
    pub phone: String,
    /// Unique id of the call.
    pub call_id: String,
    /// Length, in started minutes.
    pub minutes: i64,
}
message!(CallMade, "billing.call-made");

/// An SMS was sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmsSent {
    /// The account.
    pub phone: String,
    /// Unique id of the SMS.
    pub sms_id: String,
}
message!(SmsSent, "billing.sms-sent");

/// The customer paid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentReceived {
    /// The account.
    pub phone: String,
    /// Unique id of the payment.
    pub payment_id: String,
    /// The amount.
    pub cents: i64,
}
message!(PaymentReceived, "billing.payment-received");

/// Closes the statement: the saga publishes it and completes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloseStatement {
    /// The account.
    pub phone: String,
}
message!(CloseStatement, "billing.close-statement");

/// Published when the account goes below zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverdraftCharged {
    /// The account.
    pub phone: String,
    /// The charge.
    pub cents: i64,
}
message!(OverdraftCharged, "billing.overdraft-charged");

/// The compensation: an overdraft charge that a merge showed was not due after all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverdraftWaived {
    /// The account.
    pub phone: String,
    /// The charge taken back.
    pub cents: i64,
}
message!(OverdraftWaived, "billing.overdraft-waived");

/// The final statement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatementIssued {
    /// The account.
    pub phone: String,
    /// The statement.
    pub statement: Statement,
}
message!(StatementIssued, "billing.statement-issued");

/// A credit to the account.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BalanceItem {
    /// Unique id.
    pub id: String,
    /// Amount.
    pub cents: i64,
}

/// Something the account is charged for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ActionItem {
    /// Unique id.
    pub id: String,
    /// What it was.
    pub what: String,
    /// Its price.
    pub cents: i64,
}

/// The billing state of one account.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    /// Credits.
    pub balances: Vec<BalanceItem>,
    /// Charges for calls and SMS.
    pub actions: Vec<ActionItem>,
    /// The overdraft charge, recalculated from the items.
    pub overdraft_cents: i64,
}

impl Statement {
    /// Credits minus charges, the overdraft charge included.
    pub fn balance(&self) -> i64 {
        self.balances.iter().map(|b| b.cents).sum::<i64>()
            - self.actions.iter().map(|a| a.cents).sum::<i64>()
            - self.overdraft_cents
    }

    fn add_balance(&mut self, item: BalanceItem) {
        if !self.balances.iter().any(|b| b.id == item.id) {
            self.balances.push(item);
        }
    }

    fn add_action(&mut self, item: ActionItem) {
        if !self.actions.iter().any(|a| a.id == item.id) {
            self.actions.push(item);
        }
    }

    /// Adds or removes the overdraft charge from the items (the seed's
    /// `RecalculcateCharges`). Items are kept sorted by id, so every merge order prints alike.
    pub fn recalculate_charges(&mut self) {
        self.balances.sort();
        self.actions.sort();
        self.overdraft_cents = 0;
        self.overdraft_cents = if self.balance() < 0 {
            OVERDRAFT_CENTS
        } else {
            0
        };
    }

    /// The statement as text.
    pub fn render(&self, phone: &str) -> String {
        let money = |c: i64| {
            format!(
                "{}{}.{:02}$",
                if c < 0 { "-" } else { "" },
                c.abs() / 100,
                c.abs() % 100
            )
        };
        let mut out = format!("statement of {phone}\n");
        for b in &self.balances {
            out += &format!("  {:<12} {:<20} {:>10}\n", b.id, "credit", money(b.cents));
        }
        for a in &self.actions {
            out += &format!("  {:<12} {:<20} {:>10}\n", a.id, a.what, money(-a.cents));
        }
        if self.overdraft_cents != 0 {
            out += &format!(
                "  {:<12} {:<20} {:>10}\n",
                "-",
                "overdraft charge",
                money(-self.overdraft_cents)
            );
        }
        out += &format!("  {:<33} {:>10}", "balance", money(self.balance()));
        out
    }
}

/// Merges statements: every item once, by id, then the charges recalculated.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatementMerger;

impl SagaStateMerger<Statement> for StatementMerger {
    fn merge(&self, states: Vec<Statement>) -> Statement {
        let mut merged = Statement::default();
        for state in states {
            state
                .balances
                .into_iter()
                .for_each(|b| merged.add_balance(b));
            state.actions.into_iter().for_each(|a| merged.add_action(a));
        }
        merged.recalculate_charges();
        merged
    }
}

/// The billing saga of one account.
#[derive(Debug, Clone, Copy, Default)]
pub struct BillingSaga;

impl Saga for BillingSaga {
    const NAME: &'static str = "billing.statement";
    type State = Statement;
    type Key = String;

    fn routes(routes: &mut Routes<Self>) {
        routes
            .initiated_by::<OpenAccount>()
            .orchestrates::<CallMade>()
            .orchestrates::<SmsSent>()
            .orchestrates::<PaymentReceived>()
            .orchestrates::<CloseStatement>();
    }
}

impl BillingSaga {
    /// Recalculates after a change and publishes a charge that just became due.
    fn charge(saga: &mut SagaContext<Self>, phone: &str) -> Result<(), HandlerError> {
        let before = saga.state.overdraft_cents;
        saga.state.recalculate_charges();
        if saga.state.overdraft_cents > before {
            saga.publish(&OverdraftCharged {
                phone: phone.into(),
                cents: saga.state.overdraft_cents - before,
            })?;
        }
        Ok(())
    }
}

#[async_trait]
impl InitiatedBy<OpenAccount> for BillingSaga {
    fn correlate(m: &OpenAccount) -> String {
        m.phone.clone()
    }
    async fn handle(
        &self,
        m: OpenAccount,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError> {
        saga.state.add_balance(BalanceItem {
            id: m.deposit_id,
            cents: m.cents,
        });
        Self::charge(saga, &m.phone)
    }
}

#[async_trait]
impl Orchestrates<CallMade> for BillingSaga {
    fn correlate(m: &CallMade) -> String {
        m.phone.clone()
    }
    async fn handle(&self, m: CallMade, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        saga.state.add_action(ActionItem {
            id: m.call_id,
            what: format!("call, {} min", m.minutes),
            cents: m.minutes * MINUTE_CENTS,
        });
        Self::charge(saga, &m.phone)
    }
}

#[async_trait]
impl Orchestrates<SmsSent> for BillingSaga {
    fn correlate(m: &SmsSent) -> String {
        m.phone.clone()
    }
    async fn handle(&self, m: SmsSent, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        saga.state.add_action(ActionItem {
            id: m.sms_id,
            what: "sms".into(),
            cents: SMS_CENTS,
        });
        Self::charge(saga, &m.phone)
    }
}

#[async_trait]
impl Orchestrates<PaymentReceived> for BillingSaga {
    fn correlate(m: &PaymentReceived) -> String {
        m.phone.clone()
    }
    async fn handle(
        &self,
        m: PaymentReceived,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError> {
        saga.state.add_balance(BalanceItem {
            id: m.payment_id,
            cents: m.cents,
        });
        Self::charge(saga, &m.phone)
    }
}

#[async_trait]
impl Orchestrates<CloseStatement> for BillingSaga {
    fn correlate(m: &CloseStatement) -> String {
        m.phone.clone()
    }
    async fn handle(
        &self,
        m: CloseStatement,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError> {
        let statement = saga.state.clone();
        saga.publish(&StatementIssued {
            phone: m.phone,
            statement,
        })?;
        saga.complete();
        Ok(())
    }
}

#[async_trait]
impl OrchestratesMerge for BillingSaga {
    /// A charge one branch took that the merged statement no longer owes is taken back; one
    /// that only the merge shows is charged.
    async fn merged(
        &self,
        merge: MergeSagaState<Statement>,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError> {
        let charged = merge
            .siblings
            .iter()
            .map(|s| s.overdraft_cents)
            .max()
            .unwrap_or(0);
        let due = saga.state.overdraft_cents;
        let phone = saga.key().to_owned();
        if charged > due {
            saga.publish(&OverdraftWaived {
                phone,
                cents: charged - due,
            })?;
        } else if due > charged {
            saga.publish(&OverdraftCharged {
                phone,
                cents: due - charged,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhinobus_sagas::SagaHarness;

    #[tokio::test]
    async fn a_late_payment_waives_the_overdraft_charge() {
        let h = SagaHarness::merging(BillingSaga, StatementMerger);
        let phone = "555-5421".to_string();
        h.handle(&OpenAccount {
            phone: phone.clone(),
            deposit_id: "d1".into(),
            cents: 1_000,
        })
        .await
        .unwrap();
        let sent = h
            .handle(&CallMade {
                phone: phone.clone(),
                call_id: "c1".into(),
                minutes: 3,
            })
            .await
            .unwrap();
        assert_eq!(
            sent[0].decode::<OverdraftCharged>().map(|c| c.cents),
            Some(OVERDRAFT_CENTS)
        );
        h.handle(&PaymentReceived {
            phone: phone.clone(),
            payment_id: "p1".into(),
            cents: 2_000,
        })
        .await
        .unwrap();
        let s = h.state(&phone).await.unwrap().unwrap();
        assert_eq!(s.overdraft_cents, 0);
        assert_eq!(s.balance(), 1_000 + 2_000 - 1_500);
    }

    #[test]
    fn merging_keeps_every_item_once_and_recalculates() {
        let base = Statement {
            balances: vec![BalanceItem {
                id: "d1".into(),
                cents: 1_000,
            }],
            ..Statement::default()
        };
        let mut call = base.clone();
        call.add_action(ActionItem {
            id: "c1".into(),
            what: "call".into(),
            cents: 1_500,
        });
        call.recalculate_charges();
        assert_eq!(call.overdraft_cents, OVERDRAFT_CENTS);
        let mut paid = base.clone();
        paid.add_balance(BalanceItem {
            id: "p1".into(),
            cents: 2_000,
        });
        let merged = StatementMerger.merge(vec![call.clone(), paid.clone(), call]);
        assert_eq!(merged.balances.len(), 2);
        assert_eq!(merged.actions.len(), 1);
        assert_eq!(merged.overdraft_cents, 0);
        assert_eq!(StatementMerger.merge(vec![paid, base]).balances.len(), 2);
    }
}
